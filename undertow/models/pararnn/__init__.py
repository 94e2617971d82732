"""ParaRNN (ParaGRU / ParaLSTM, trained in parallel over time by Newton) and hybrid language models."""
