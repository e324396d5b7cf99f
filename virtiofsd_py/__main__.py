import sys

from virtiofsd_py.cli import main

sys.exit(main())
