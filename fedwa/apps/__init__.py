"""Flower's apps: the ServerApp, the ClientApp and the decentralized relay. Each receives the
parts of its run; none builds them (:mod:`fedwa.run.compose` does)."""
