import sys

from entrgi.cli import main

sys.exit(main())
