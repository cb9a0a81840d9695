"""corem: the CORE-M device-link CoAP adapter."""

__version__ = "0.1.0"
