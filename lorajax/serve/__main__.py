"""``python -m lorajax.serve --model DIR --adapter NAME=DIR ... [--port 8000]``: the OpenAI-compatible server
(`lorajax.serve.server`)."""

import sys

from lorajax.serve.server import main

if __name__ == "__main__":
    sys.exit(main())
