"""The command line: argparse and printing only, one module per verb (`nas.commands.main` puts them together)."""
