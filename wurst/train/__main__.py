import sys

from wurst.train.app import main

sys.exit(main())
