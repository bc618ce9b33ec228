"""Thin HTTP routers: validate, call the core, shape the response."""
