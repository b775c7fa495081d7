"""fedhead site side: data loading, local training, the Flower ClientApp."""
