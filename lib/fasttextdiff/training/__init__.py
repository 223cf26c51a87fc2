"""Training loops on one accelerate engine: segmenter, backbone pretraining, text MLM; the jobs the server runs."""
