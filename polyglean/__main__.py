"""``python -m polyglean`` runs the command line."""

import sys

from polyglean.cli.main import main

sys.exit(main())
