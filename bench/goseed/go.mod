module goseed

go 1.19
