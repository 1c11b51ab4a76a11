"""The built-in demo zoo: build it offline, merge it, protect and publish it."""
