"""The `wara` command and the end-to-end demo: above every part (core <- training <- exporter
<- runtime <- here), so no package below imports this one."""
