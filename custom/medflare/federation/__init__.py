"""Running a real federation: NVFlare POC mode on this machine."""
