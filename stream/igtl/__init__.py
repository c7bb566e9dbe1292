"""OpenIGTLink: codec, framing, polydata, our server and sinks, the client source, pose pairing,
and the simulated PLUS-like server."""
