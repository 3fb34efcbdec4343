"""hotfolder: a hot-folder daemon that removes photo backgrounds in GPU batches."""

__version__ = "0.1.0"
