"""`python -m nas` runs the command line."""
import sys

from nas.commands.main import main

sys.exit(main())
