"""Tenants, devices, credentials and profiles (SQLite)."""

from .store import Device, Directory, Registry, RegistryError

__all__ = ["Device", "Directory", "Registry", "RegistryError"]
