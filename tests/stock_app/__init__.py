"""A Flower app written the way Flower's quickstart writes one, knowing nothing of fedwa except
its strategies: the test bed for ``strategies.*.start()`` in a user's own ServerApp."""
