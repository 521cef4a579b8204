"""FedPipe-style planning: resource profiles, cost model, importance, configurator."""
