"""The trained ranker: training examples, LoRA training, the adapter on disk and its selection."""
