from hotfolder.cli import command

command()
