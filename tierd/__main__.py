import sys

from tierd.server import main

sys.exit(main())
