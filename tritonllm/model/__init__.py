"""The model: its architecture facts (`shape`, torch-free), the exported graph's interface
(`graph_io`, numpy only), our decoder module (`modeling`, torch) and checkpoint preparation (`prep`)."""
