"""The stock agent: ``comzy [PORT]``."""
