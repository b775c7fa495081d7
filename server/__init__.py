"""fedhead server side: the round loop, aggregation, reports, the Flower ServerApp."""
