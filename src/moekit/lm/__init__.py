"""Language models on real text: corpora, tokenizers, training (``moekit train-lm``) and pretrained loaders."""
