import sys

from serve.batch.cli import main

sys.exit(main())
