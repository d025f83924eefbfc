"""Dataset preparation: one module per dataset, each turning raw files into the prepared format
(`mmlab_cli.data.format`)."""
