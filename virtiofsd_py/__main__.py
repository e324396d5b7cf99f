import sys

from virtiofsd_py.app.cli import main

sys.exit(main())
