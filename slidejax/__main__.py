import sys

from slidejax.cli import main

sys.exit(main())
