"""The read side of an output table: info, search, index, eval. No Ray; the model only to
embed queries."""
