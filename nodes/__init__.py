"""The processes that run at sites and centrally: data node, executor, store, auth, grid."""
