import sys

from hotfolder.cli import main

sys.exit(main())
