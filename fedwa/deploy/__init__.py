"""Run fedwa through Flower's Deployment Engine (temporary re-export while the split lands)."""
from fedwa.deploy.launcher import *  # noqa: F401,F403
