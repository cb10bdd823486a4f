"""The HTTP layer: node routes, problem responses, the uvicorn protocol, the grid and its relay."""
