#!/usr/bin/env python3
"""N local processes over 127.0.0.1 with fake CPU devices; see ftjax/launch.py.

  python launch/local.py --processes 2 --devices-per-process 4 -- ftjax train --config ...
"""

import sys

from ftjax import launch

if __name__ == '__main__':
  sys.exit(launch.main())
