//! TEMPORARY dev driver for the crash writer until `sq-cloud store-writer` is wired.
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let get = |k: &str| a.iter().position(|x| x == k).map(|i| a[i + 1].clone()).expect("arg");
    let r = node::store::crash_writer::crash_writer(std::path::Path::new(&get("--data")), &get("--tenant"), get("--seed").parse().unwrap());
    eprintln!("{r:?}");
    std::process::exit(1);
}
