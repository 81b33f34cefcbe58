import sys

from hpseg.cli.main import main

sys.exit(main())
