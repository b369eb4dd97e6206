"""The Spark side: the preprocessing job and the batch-scoring job, the input listing and output writing they share (io), the split assignment, the Spark session settings and the --py-files zip."""
