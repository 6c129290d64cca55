"""spn: Soft Proposal Networks (Zhu et al., ICCV 2017) for PyTorch."""
