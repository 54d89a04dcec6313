"""tunebook.patch() and the start-up hook: real libraries and kernels written as libraries write them."""
