import sys

from wsimamba.cli import main

sys.exit(main())
