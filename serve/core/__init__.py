"""The router core shared by training, the batch job and the Serve app: the artifact, the decision rules, the
cascade step, the post-hoc estimator, the encoder, prompt features and the prompt-file reader. It imports
neither Ray Serve nor `training`."""
