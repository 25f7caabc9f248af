"""The HTTP API service: FastAPI app, uvicorn server, routes and middleware.  [web server]"""
