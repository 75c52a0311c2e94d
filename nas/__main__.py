"""`python -m nas` runs the command line."""
import sys

from nas.cli import main

sys.exit(main())
