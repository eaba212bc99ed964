"""`python -m sgl_engine.server --model ... --port 30000`."""

from sgl_engine.server.launch import main

main()
