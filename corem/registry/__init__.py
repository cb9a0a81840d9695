"""Tenants, devices, credentials and profiles (SQLite)."""

from .directory import Directory
from .store import Device, Registry, RegistryError, credentials, same_credentials

__all__ = ["Device", "Directory", "Registry", "RegistryError", "credentials", "same_credentials"]
