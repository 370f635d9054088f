"""Text: captions to tokens -- cleaning, the tokenizer folder, tokenisation, MLM masking (`tokens`)
and the caption-swap term's word swaps (`swap`)."""
