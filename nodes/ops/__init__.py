"""Operations: admin functions, the node CLI, doctor, provisioning, launchers, wheelhouse."""
