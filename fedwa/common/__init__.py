"""What every layer shares: fedwa's errors, its run-config key type and checks, loading users'
plug-ins by import path, and loading files without running their code. No Flower, no models."""
