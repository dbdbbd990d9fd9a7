pub extern "C" fn main(_: u64, _: u64, _: u64, _: u64) -> ! {
    super::exit(3)
}
