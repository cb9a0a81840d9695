"""Device management at run time: downlink (attributes, RPC, commands) and the commands topic."""
