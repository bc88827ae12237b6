"""The Ray Serve app (serve/tah.py) and its OpenAI protocol layer (serve/protocol.py)."""
